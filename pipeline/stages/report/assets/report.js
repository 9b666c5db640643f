function sortBy(th){
 const table=th.closest('table'),body=table.tBodies[0],i=Array.from(th.parentNode.children).indexOf(th);
 const num=th.dataset.type==='num',desc=th.dataset.dir?th.dataset.dir==='asc':num;
 for(const h of th.parentNode.children){delete h.dataset.dir;}
 th.dataset.dir=desc?'desc':'asc';
 const val=r=>{const c=r.cells[i];return c.dataset.v!==undefined?c.dataset.v:c.textContent.trim();};
 const rows=Array.from(body.rows);
 rows.sort((a,b)=>{const x=val(a),y=val(b);if(x===''||y==='')return(x==='')-(y==='');
  const c=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});return desc?-c:c;});
 for(const r of rows)body.appendChild(r);
}
document.querySelectorAll('table.sortable th').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
const hook=location.hash.match(/^#sort=([A-Za-z0-9_-]+)$/);
if(hook){const th=document.querySelector('table.sortable th[data-key="'+hook[1]+'"]');if(th)th.click();}
